"""The report's figures (matplotlib, Agg canvas; no pyplot, so no global backend or state is touched).

Every function takes plain numpy data and a ``path``, writes one PNG and returns the path. Layer axes ("along
depth") list the quantized linears (or blocks) in execution order: stacks in the order they were quantized
(towers before the decoder), blocks in order; block boundaries are drawn faintly and stack boundaries solid.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "MODALITY_COLORS",
    "embedding_plot",
    "plot_activation_range",
    "plot_bits",
    "plot_clip",
    "plot_dispersion",
    "plot_kurtosis",
    "plot_outlier_heatmap",
    "plot_rel_error",
]

#: Okabe–Ito colours (colour-blind safe), one per modality, the same in every figure.
MODALITY_COLORS = {
    "all": "#444444",
    "text": "#0072B2",
    "image": "#E69F00",
    "audio": "#009E73",
    "video": "#CC79A7",
}
MODALITY_ORDER = ("all", "text", "image", "video", "audio")
RECIPE_COLORS = [
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
    "#ff7f0e",
]
RECIPE_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]
STACK_COLORS = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00"]

WIDTH = 11.0  # inches; at DPI 120 this is the page's content width
DPI = 120
_RC = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 7.5,
    "ytick.labelsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.25,
    "grid.linewidth": 0.6,
    "axes.titleweight": "bold",
    "axes.titlelocation": "left",
    "legend.frameon": False,
    "savefig.facecolor": "white",
    "figure.facecolor": "white",
    # a fixed title height skips matplotlib's costly automatic title placement
    "axes.titley": 1.0,
    "axes.titlepad": 5.0,
}


def modality_color(m: str) -> str:
    return MODALITY_COLORS.get(m, "#777777")


def recipe_style(i: int) -> dict:
    return {"color": RECIPE_COLORS[i % len(RECIPE_COLORS)], "marker": RECIPE_MARKERS[i % len(RECIPE_MARKERS)]}


@contextlib.contextmanager
def _figure(height: float, width: float = WIDTH):
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with matplotlib.rc_context(_RC):
        fig = Figure(figsize=(width, height), dpi=DPI)  # fixed margins: constrained layout doubles the cost
        FigureCanvasAgg(fig)
        yield fig


def _adjust(
    fig,
    left: float = 0.75,
    right: float = 0.15,
    top: float = 0.35,
    bottom: float = 0.55,
    hspace: float = 0.0,
    wspace: float = 0.0,
) -> None:
    """Margins and gaps in inches (converted to figure fractions)."""
    w, h = fig.get_size_inches()
    fig.subplots_adjust(
        left=left / w, right=1 - right / w, top=1 - top / h, bottom=bottom / h, hspace=hspace, wspace=wspace
    )


def _save(fig, path: str | Path) -> Path:
    from matplotlib.ticker import NullLocator

    path = Path(path)
    for ax in fig.axes:  # minor ticks of log axes are many Tick objects and dominate the drawing time
        for axis in (ax.xaxis, ax.yaxis):
            if axis.get_scale() == "log":
                axis.set_minor_locator(NullLocator())
    fig.savefig(path, dpi=DPI, format="png")
    return path


# ------------------------------------------------------------------------------------------- depth axis


def _groups(keys: Sequence[tuple[str, int, str]]) -> tuple[list[tuple[int, str]], list[int], list[int]]:
    """Block tick positions/labels, block boundaries and stack boundaries of (stack, block, linear) keys."""
    ticks, block_bounds, stack_bounds = [], [], []
    prev = None
    for i, (stack, block, _lin) in enumerate(keys):
        if prev is None or (stack, block) != prev:
            ticks.append((i, f"{stack}.{block}"))
            if prev is not None:
                (stack_bounds if stack != prev[0] else block_bounds).append(i)
            prev = (stack, block)
    return ticks, block_bounds, stack_bounds


def _depth_axis(ax, keys: Sequence[tuple[str, int, str]], *, label: bool = True) -> None:
    """x axis over linears: one labelled tick per block, faint block and solid stack separators."""
    ticks, block_bounds, stack_bounds = _groups(keys)
    step = max(1, math.ceil(len(ticks) / 24))
    shown = ticks[::step]
    ax.set_xticks([t for t, _ in shown])
    ax.set_xticklabels(
        [s for _, s in shown] if label else [],
        rotation=0 if len(shown) <= 12 else 45,
        ha="center" if len(shown) <= 12 else "right",
    )
    ax.grid(False, axis="x")
    for b in block_bounds:
        ax.axvline(b - 0.5, color="#000000", alpha=0.08, lw=0.8)
    for b in stack_bounds:
        ax.axvline(b - 0.5, color="#000000", alpha=0.45, lw=1.0)
    ax.set_xlim(-0.6, len(keys) - 0.4)


def _block_axis(ax, blocks: Sequence[tuple[str, int]]) -> None:
    step = max(1, math.ceil(len(blocks) / 14))
    ax.set_xticks(range(0, len(blocks), step))
    ax.set_xticklabels(
        [f"{s}.{b}" for s, b in blocks][::step],
        rotation=45 if len(blocks) > 4 else 0,
        ha="right" if len(blocks) > 4 else "center",
    )
    for i in range(1, len(blocks)):
        if blocks[i][0] != blocks[i - 1][0]:
            ax.axvline(i - 0.5, color="#000000", alpha=0.45, lw=1.0)
    ax.set_xlim(-0.4, len(blocks) - 0.6)


def _positive(a: np.ndarray, floor: float = 1e-12) -> np.ndarray:
    a = np.asarray(a, dtype=float)
    return np.where(np.isfinite(a) & (a > 0), a, np.nan).clip(min=floor)


def _order(mods) -> list[str]:
    return sorted(mods, key=lambda m: MODALITY_ORDER.index(m) if m in MODALITY_ORDER else 99)


# ------------------------------------------------------------------------------------------- activations


def _legend_above(ax, handles=None, labels=None, ncols: int | None = None, **kw):
    """Legend in the title row, right-aligned (titles are left-aligned), so it never hides data."""
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return None
    return ax.legend(
        handles,
        labels,
        loc="lower right",
        bbox_to_anchor=(1.0, 1.0),
        ncols=ncols or len(handles),
        borderaxespad=0.2,
        handlelength=1.6,
        columnspacing=1.0,
        **kw,
    )


def plot_activation_range(
    keys: Sequence[tuple[str, int, str]], bands: dict[str, dict[str, np.ndarray]], path: str | Path
) -> Path:
    """Per-channel absmax spread per linear and modality.

    ``bands[modality]`` has arrays over ``keys`` (NaN where the modality did not reach the layer): ``p50`` and
    optionally ``p10``/``p90`` (percentiles over channels of the per-channel absmax) and ``max``. Top panel:
    per linear and modality a bar from the 10th to the 90th percentile of channels, a dot at the median
    channel and a tick at the largest one (side by side per modality; above 80 linears, lines with shaded
    bands).
    Bottom panel: largest / median channel (how far the worst channel sticks out).
    """
    from matplotlib.lines import Line2D

    mods = _order(bands)
    n = len(keys)
    dodge = n <= 80
    with _figure(5.6) as fig:
        ax1, ax2 = fig.subplots(2, 1, sharex=True, height_ratios=[1.7, 1])
        x = np.arange(n, dtype=float)
        step = 0.78 / max(len(mods), 1)
        lw = max(1.2, min(5.0, 0.6 * 72 * (WIDTH - 1) / max(n, 1) * step))
        for j, m in enumerate(mods):
            b, c = bands[m], modality_color(m)
            p50 = _positive(b["p50"])
            xm = x + ((j - (len(mods) - 1) / 2) * step if dodge else 0.0)
            has_band = "p10" in b and "p90" in b
            if dodge:
                if has_band:
                    ax1.vlines(xm, _positive(b["p10"]), _positive(b["p90"]), color=c, lw=lw, alpha=0.45)
                ax1.plot(xm, p50, color=c, lw=0.7, alpha=0.45)
                ax1.scatter(xm, p50, color=c, s=11, zorder=3, lw=0)
                if "max" in b:
                    ax1.scatter(
                        xm, _positive(b["max"]), color=c, marker="_", s=max(20.0, lw * 9), lw=1.4, zorder=3
                    )
            else:
                if has_band:
                    ax1.fill_between(x, _positive(b["p10"]), _positive(b["p90"]), color=c, alpha=0.16, lw=0)
                ax1.plot(x, p50, color=c, lw=1.4)
                if "max" in b:
                    ax1.plot(x, _positive(b["max"]), color=c, lw=0.8, ls=":")
            if "max" in b:
                ax2.plot(
                    xm, _positive(b["max"]) / p50, color=c, lw=1.3, marker="o", ms=2.5 if n <= 120 else 0
                )
        grey = "#555555"
        handles = [Line2D([], [], color=modality_color(m), lw=0, marker="s", ms=7, label=m) for m in mods]
        if dodge:
            handles += [
                Line2D([], [], color=grey, lw=4, alpha=0.45, label="10–90 % of channels"),
                Line2D([], [], color=grey, lw=0, marker="o", ms=4, label="median channel"),
                Line2D([], [], color=grey, lw=0, marker="_", ms=9, mew=1.4, label="largest channel"),
            ]
        else:
            handles += [
                Line2D([], [], color=grey, lw=6, alpha=0.25, label="10–90 % of channels"),
                Line2D([], [], color=grey, lw=1.4, label="median"),
                Line2D([], [], color=grey, lw=0.8, ls=":", label="largest"),
            ]
        ax1.set_yscale("log")
        ax1.set_ylabel("per-channel |x| max")
        ax1.set_title("Activation range per layer")
        _legend_above(ax1, handles, [h.get_label() for h in handles])
        ax2.set_ylabel("largest / median")
        ax2.set_ylim(bottom=min(1.0, ax2.get_ylim()[0]))
        ax2.set_title("Outlier strength: largest over median channel range")
        _depth_axis(ax1, keys, label=False)
        _depth_axis(ax2, keys)
        ax2.set_xlabel("quantized linear along depth (ticks: first linear of each block)")
        _adjust(fig, top=0.4, bottom=0.8, hspace=0.3)
        return _save(fig, path)


def plot_kurtosis(
    keys: Sequence[tuple[str, int, str]], kurt: dict[str, dict[str, np.ndarray]], path: str | Path
) -> Path:
    """``kurt[modality] = {"median": [...], "max": [...]}`` over ``keys`` (kurtosis over tokens, per
    channel)."""
    from matplotlib.lines import Line2D

    mods = _order(kurt)
    with _figure(3.3) as fig:
        ax = fig.subplots()
        x = np.arange(len(keys))
        for m in mods:
            c = modality_color(m)
            if "median" in kurt[m]:
                ax.plot(x, _positive(kurt[m]["median"]), color=c, lw=1.6, marker="o", ms=2.5)
            if "max" in kurt[m]:
                ax.plot(x, _positive(kurt[m]["max"]), color=c, lw=1.0, ls="--")
        ax.axhline(3.0, color="#000000", lw=0.8, alpha=0.5)
        ax.annotate(
            "Gaussian = 3", (0, 3.0), xytext=(2, -9), textcoords="offset points", fontsize=7, alpha=0.7
        )
        ax.set_yscale("log")
        ax.set_ylabel("kurtosis over tokens")
        ax.set_title("Kurtosis per layer")
        grey = "#555555"
        handles = [Line2D([], [], color=modality_color(m), lw=0, marker="s", ms=7, label=m) for m in mods]
        handles += [
            Line2D([], [], color=grey, lw=1.6, marker="o", ms=2.5, label="median channel"),
            Line2D([], [], color=grey, lw=1.0, ls="--", label="most heavy-tailed channel"),
        ]
        _legend_above(ax, handles, [h.get_label() for h in handles])
        _depth_axis(ax, keys)
        _adjust(fig, top=0.4, bottom=0.5)
        return _save(fig, path)


# ------------------------------------------------------------------------------------------- comparisons


def plot_rel_error(
    blocks: Sequence[tuple[str, int]], errors: dict[str, dict[str, np.ndarray]], path: str | Path
) -> Path:
    """``errors[recipe][modality]``: relative squared block-output error over ``blocks`` (NaN: not quantized).

    One panel per modality (``all`` first), one line per recipe, shared log y axis.
    """
    mods = _order({m for per in errors.values() for m in per})
    n = len(mods)
    cols = n if n <= 4 else 3
    rows = math.ceil(n / cols)
    with _figure(2.9 * rows + 0.4) as fig:
        axes = np.atleast_1d(fig.subplots(rows, cols, sharey=True, squeeze=False)).reshape(-1)
        x = np.arange(len(blocks))
        for ax, m in zip(axes, mods):
            for i, (recipe, per) in enumerate(errors.items()):
                if m in per:
                    st = recipe_style(i)
                    ax.plot(
                        x,
                        _positive(per[m], 1e-16),
                        color=st["color"],
                        marker=st["marker"],
                        ms=4,
                        lw=1.5,
                        label=recipe,
                    )
            ax.set_yscale("log")
            ax.set_title(f"{m} tokens" if m != "all" else "all tokens", color=modality_color(m))
            _block_axis(ax, blocks)
        for ax in axes[n:]:
            ax.set_visible(False)
        for ax in axes[::cols]:
            ax.set_ylabel("‖Yq − Yfp‖² / ‖Yfp‖²")
        handles, labels = axes[0].get_legend_handles_labels()
        seen = dict(zip(labels, handles))
        for ax in axes[1:n]:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                seen.setdefault(lab, h)
        w, h = fig.get_size_inches()
        fig.legend(
            list(seen.values()),
            list(seen.keys()),
            loc="upper right",
            ncols=len(seen),
            bbox_to_anchor=(1 - 0.15 / w, 1 - 0.02 / h),
            title="recipe:",
            title_fontsize=8,
            alignment="right",
        )
        _adjust(fig, top=0.65, bottom=0.75, wspace=0.06, hspace=0.75)
        return _save(fig, path)


def plot_bits(
    keys: Sequence[tuple[str, int, str]], data: dict[str, dict[str, np.ndarray]], path: str | Path
) -> Path:
    """``data[recipe] = {"fraction": [...], "bits": [...]}`` over ``keys``: the 16-bit channel share (bars)
    and the effective activation bits (lines) per linear."""
    with _figure(4.6) as fig:
        ax1, ax2 = fig.subplots(2, 1, sharex=True, height_ratios=[1, 1])
        x = np.arange(len(keys))
        n = max(len(data), 1)
        width = 0.8 / n
        for i, (recipe, d) in enumerate(data.items()):
            st = recipe_style(i)
            frac = np.asarray(d.get("fraction", np.full(len(keys), np.nan)), dtype=float)
            ax1.bar(
                x - 0.4 + width * (i + 0.5),
                100 * np.nan_to_num(frac, nan=0.0),
                width=width,
                color=st["color"],
                alpha=0.85,
                label=recipe,
            )
            bits = np.asarray(d.get("bits", np.full(len(keys), np.nan)), dtype=float)
            ax2.plot(
                x,
                bits,
                color=st["color"],
                marker=st["marker"],
                ms=3,
                lw=1.3,
                label=recipe,
                drawstyle="default",
            )
        ax1.set_ylabel("16-bit channels (%)")
        ax1.set_title("Share of input channels kept in 16 bits (DABC outlier channels)")
        _legend_above(ax1)
        ax2.set_ylabel("effective bits")
        ax2.set_title("Effective activation bits per linear (low-bit width + 16 × 16-bit share)")
        _depth_axis(ax1, keys, label=False)
        _depth_axis(ax2, keys)
        _adjust(fig, bottom=0.5, hspace=0.3)
        return _save(fig, path)


# ------------------------------------------------------------------------------------------- method arrays


def stack_color(stack: str, i: int = 0) -> str:
    """Stacks take the colour of their modality (vision → image, audio → audio, decoder → text)."""
    s = stack.lower()
    for keys, m in (
        (("vision", "visual", "image", "vit", "dino"), "image"),
        (("audio", "whisper", "speech"), "audio"),
        (("video",), "video"),
        (("text", "decoder", "language", "llm", "lm"), "text"),
    ):
        if any(k in s for k in keys):
            return MODALITY_COLORS[m]
    return STACK_COLORS[(i + 4) % len(STACK_COLORS)]


def plot_dispersion(panels: Sequence[dict], path: str | Path) -> Path:
    """Dispersion score per input channel for a few linears, with the local and global thresholds.

    Each panel: ``{"name", "scores", "mask", "local", "global"}`` (thresholds may be ``None``).
    """
    from matplotlib.lines import Line2D

    n = len(panels)
    cols = min(n, 2)
    rows = math.ceil(n / cols)
    with _figure(2.75 * rows + 0.6) as fig:
        axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).reshape(-1)
        for ax, p in zip(axes, panels):
            s = np.asarray(p["scores"], dtype=float)
            mask = np.asarray(p["mask"]).astype(bool) if p.get("mask") is not None else np.zeros(len(s), bool)
            ch = np.arange(len(s))
            if len(s) <= 96:
                ax.vlines(ch, 0, s, color="#b8c2cc", lw=0.8)
            ax.scatter(ch[~mask], s[~mask], s=6 if len(s) <= 512 else 2, color="#52606d", zorder=3, lw=0)
            if mask.any():
                ax.scatter(ch[mask], s[mask], s=24, color="#d62728", zorder=4, lw=0)
            thr = []
            if p.get("local") is not None:
                ax.axhline(p["local"], color="#0072B2", ls="--", lw=1.2)
                thr.append(f"local {p['local']:.3g}")
            if p.get("global") is not None:
                ax.axhline(p["global"], color="#E69F00", ls=":", lw=1.8)
                thr.append(f"global {p['global']:.3g}")
            ax.set_title(
                f"{p['name']}\n{int(mask.sum())}/{len(s)} outlier channels"
                + (f" · thresholds: {', '.join(thr)}" if thr else ""),
                fontsize=8.5,
                linespacing=1.4,
            )
            ax.set_xlabel("input channel")
            ax.set_ylabel("dispersion D_c")
            ax.set_xlim(-1, len(s))
            ax.set_ylim(bottom=0)
        for ax in axes[n:]:
            ax.set_visible(False)
        handles = [
            Line2D([], [], color="#52606d", lw=0, marker="o", ms=3.5, label="channel"),
            Line2D([], [], color="#d62728", lw=0, marker="o", ms=6, label="outlier channel (16-bit)"),
            Line2D([], [], color="#0072B2", ls="--", lw=1.2, label="local threshold μ+kσ (this layer)"),
            Line2D([], [], color="#E69F00", ls=":", lw=1.8, label="global threshold μ+kσ (all layers)"),
        ]
        w, h = fig.get_size_inches()
        fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.75 / w, 1 - 0.03 / h), ncols=4)
        _adjust(fig, top=0.85, bottom=0.5, wspace=0.16, hspace=0.8)
        return _save(fig, path)


def _maxpool(grid: np.ndarray, axis: int, size: int) -> np.ndarray:
    """Max over consecutive bins of ``size`` along ``axis`` (NaN only where a whole bin is NaN)."""
    if size <= 1:
        return grid
    g = np.moveaxis(grid, axis, 0)
    pad = (-g.shape[0]) % size
    g = np.concatenate([g, np.full((pad,) + g.shape[1:], np.nan)]) if pad else g
    g = g.reshape(g.shape[0] // size, size, *g.shape[1:])
    with np.errstate(all="ignore"):
        allnan = np.isnan(g).all(1)
        out = np.where(allnan, np.nan, np.nanmax(np.where(np.isnan(g), -np.inf, g), axis=1))
    return np.moveaxis(out, 0, axis)


def plot_outlier_heatmap(names: Sequence[str], masks: Sequence[np.ndarray], path: str | Path) -> Path:
    """Layer × channel map of the outlier channels (dark = 16-bit channel, grey = beyond the layer's width).

    Wide layers are max-pooled over channel bins (an outlier anywhere in a bin marks the bin), so none is lost
    when the map is wider than the image.
    """
    from matplotlib.colors import ListedColormap

    width = max(len(m) for m in masks)
    grid = np.full((len(masks), width), np.nan)
    for i, m in enumerate(masks):
        grid[i, : len(m)] = np.asarray(m, dtype=float) > 0
    cbin = max(1, math.ceil(width / 1000))
    grid = _maxpool(grid, 1, cbin)
    many = len(names) > 80
    h = min(max(1.8, (0.05 if many else 0.16) * len(names) + 1.0), 16.0)
    with _figure(h) as fig:
        ax = fig.subplots()
        cmap = ListedColormap(["#ffffff", "#b4000f"]).with_extremes(bad="#dde1e6")
        ax.imshow(
            np.ma.masked_invalid(grid),
            aspect="auto",
            interpolation="nearest",
            cmap=cmap,
            vmin=0,
            vmax=1,
            extent=(-0.5, width - 0.5, len(names) - 0.5, -0.5),
        )
        if many:  # label blocks, not linears
            ticks, labels, prev = [], [], None
            for i, nm in enumerate(names):
                blk = ".".join(nm.split(".")[:2])
                if blk != prev:
                    ticks.append(i)
                    labels.append(blk)
                    prev = blk
            stepl = max(1, math.ceil(len(ticks) / 60))
            ax.set_yticks(ticks[::stepl])
            ax.set_yticklabels(labels[::stepl], fontsize=6)
            fs = 6
        else:
            fs = 7
            ax.set_yticks(range(len(names)))
            ax.set_yticklabels(names, fontsize=fs)
            counts = [int(np.sum(np.asarray(m) > 0)) for m in masks]
            ax2 = ax.secondary_yaxis("right")
            ax2.set_yticks(range(len(names)))
            ax2.set_yticklabels([f"{c}/{len(m)}" for c, m in zip(counts, masks)], fontsize=fs)
            ax2.tick_params(length=0)
        ax.set_xlabel("input channel" + (f" (bins of {cbin} channels)" if cbin > 1 else ""))
        ax.grid(False)
        prev = None
        for i, nm in enumerate(names):
            stack = nm.split(".", 1)[0]
            if prev is not None and stack != prev:
                ax.axhline(i - 0.5, color="#000000", lw=1.0)
            prev = stack
        ax.set_title("Outlier channels per layer", loc="left")
        labels_shown = [t.get_text() for t in ax.get_yticklabels()] or [""]
        longest = max(len(t) for t in labels_shown)
        _adjust(fig, left=0.25 + 0.058 * longest * fs / 7, right=0.2 if many else 0.7, top=0.35, bottom=0.5)
        return _save(fig, path)


def _hist_bins(values: list[np.ndarray]) -> np.ndarray:
    v = np.concatenate([x[np.isfinite(x)] for x in values]) if values else np.array([])
    if v.size == 0:
        return np.linspace(0, 1, 11)
    u = np.unique(np.round(v, 6))
    if len(u) == 1:
        return np.array([u[0] - 0.025, u[0] + 0.025])
    if len(u) <= 40:  # a search grid: one bar per grid value
        mids = (u[1:] + u[:-1]) / 2
        half = float(np.min(np.diff(u))) / 2
        return np.concatenate([[u[0] - half], mids, [u[-1] + half]])
    return np.linspace(float(u[0]), float(u[-1]), 31)


def plot_clip(groups: dict[str, dict[str, np.ndarray]], path: str | Path) -> Path:
    """Clip choice per channel, pooled over linears and grouped by stack.

    ``groups[stack] = {"ratio": clip ratio r_c, "alpha": α_c, "range": channel |x| max, "outlier": mask}``
    (concatenated over that stack's linears). Left: histogram of r_c over compliant channels; right: α_c vs
    channel range (log-log, the diagonal = no clipping).
    """
    colors = [stack_color(st, i) for i, st in enumerate(groups)]
    with _figure(3.7) as fig:
        ax1, ax2 = fig.subplots(1, 2, width_ratios=[1, 1.15])
        ratios = [
            np.asarray(g["ratio"], dtype=float)[~np.asarray(g["outlier"], bool)] for g in groups.values()
        ]
        bins = _hist_bins(ratios)
        ax1.hist(
            ratios,
            bins=bins,
            stacked=True,
            label=list(groups),
            color=colors,
            edgecolor="white",
            linewidth=0.5,
            rwidth=0.9 if len(bins) <= 41 else 1.0,
        )
        ax1.set_xlabel("clip ratio r_c = α_c / channel range  (1 = no clipping)")
        ax1.set_ylabel("channels")
        ax1.set_title("Chosen clip ratio (compliant channels)")
        ax1.legend(title="stack", title_fontsize=8, loc="upper left")
        allv, outs = [], []
        for i, (stack, g) in enumerate(groups.items()):
            rng, alpha = _positive(g["range"]), _positive(g["alpha"])
            out = np.asarray(g["outlier"], bool)
            ax2.scatter(rng[~out], alpha[~out], s=6, alpha=0.55, color=colors[i], label=stack, lw=0)
            outs.append((rng[out], alpha[out]))
            allv += [rng[np.isfinite(rng)], alpha[np.isfinite(alpha)]]
        if any(o[0].size for o in outs):
            ax2.scatter(
                np.concatenate([o[0] for o in outs]),
                np.concatenate([o[1] for o in outs]),
                s=22,
                marker="x",
                color="#b4000f",
                lw=1.0,
                label="outlier channel (16-bit)",
            )
        v = np.concatenate(allv) if allv else np.array([])
        if v.size:
            a, b = float(np.nanmin(v)), float(np.nanmax(v))
            ax2.plot([a, b], [a, b], color="#000000", lw=0.8, alpha=0.6, label="α = range (no clipping)")
        ax2.set_xscale("log")
        ax2.set_yscale("log")
        ax2.set_xlabel("channel range |x| max (calibration)")
        ax2.set_ylabel("clip α_c")
        ax2.set_title("Clip α vs channel range")
        ax2.legend(fontsize=7, markerscale=1.5, loc="upper left")
        _adjust(fig, bottom=0.55, wspace=0.22)
        return _save(fig, path)


# ------------------------------------------------------------------------------------------- embeddings


def _as_numpy(x, name: str) -> np.ndarray:
    from . import ReportError

    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except Exception as e:  # noqa: BLE001
        raise ReportError(f"embedding_plot: {name} is not array-like: {e}") from None


_ID_LABELS = {0: "text", 1: "image", 2: "video", 3: "audio"}  # statistics.Modality values; -1 = padding


def embedding_plot(
    fp_hidden, q_hidden, modality_ids, path: str | Path, *, max_points: int = 3000, seed: int = 0
) -> Path:
    """PCA picture of token features, FP vs quantized, one panel per modality.

    ``fp_hidden``/``q_hidden``: ``[N, H]`` (tensors or arrays) for the same N tokens; ``modality_ids``:
    ``[N]`` ints (``statistics.Modality``: 0 text, 1 image, 2 video, 3 audio; negative = padding, dropped)
    or modality names. The 2-D PCA basis is fitted on the FP features and both sets are projected onto it,
    so a shift of the quantized cloud is a real displacement. Each panel title gives the mean per-token
    cosine similarity.
    Writes ``path`` (usually ``<run dir>/embeddings.png``; ``build_report`` includes it when present).
    """
    from . import ReportError

    fp = _as_numpy(fp_hidden, "fp_hidden").astype(np.float64)
    q = _as_numpy(q_hidden, "q_hidden").astype(np.float64)
    ids = _as_numpy(modality_ids, "modality_ids").reshape(-1)
    if fp.ndim != 2 or q.shape != fp.shape:
        raise ReportError(
            f"embedding_plot: fp_hidden and q_hidden must both be [N, H]; got {fp.shape} and {q.shape}"
        )
    if ids.shape[0] != fp.shape[0]:
        raise ReportError(f"embedding_plot: modality_ids has {ids.shape[0]} entries for {fp.shape[0]} tokens")
    if ids.dtype.kind in "iub":
        labels = np.array([_ID_LABELS.get(int(i), "") if int(i) >= 0 else "" for i in ids], dtype=object)
    else:
        labels = np.array([str(i) for i in ids], dtype=object)
    keep = (labels != "") & np.isfinite(fp).all(1) & np.isfinite(q).all(1)
    if not keep.any():
        raise ReportError("embedding_plot: no finite, non-padding tokens to plot")
    fp, q, labels = fp[keep], q[keep], labels[keep]
    if len(fp) > max_points:
        sel = np.sort(np.random.default_rng(seed).choice(len(fp), max_points, replace=False))
        fp, q, labels = fp[sel], q[sel], labels[sel]
    mean = fp.mean(0)
    _, _, vt = np.linalg.svd(fp - mean, full_matrices=False)
    basis = vt[:2].T if vt.shape[0] >= 2 else np.pad(vt.T, ((0, 0), (0, 2 - vt.shape[0])))
    pf, pq = (fp - mean) @ basis, (q - mean) @ basis
    cos = (fp * q).sum(1) / np.maximum(np.linalg.norm(fp, axis=1) * np.linalg.norm(q, axis=1), 1e-30)
    mods = _order(set(labels.tolist()))
    n = len(mods)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    with _figure(3.2 * rows + 0.3, width=min(WIDTH, 3.0 * cols + 1.0)) as fig:
        axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True)).reshape(-1)
        for ax, m in zip(axes, mods):
            s = labels == m
            c = modality_color(m)
            ax.scatter(pf[~s, 0], pf[~s, 1], s=4, color="#d0d5db", lw=0, label="other modalities (FP)")
            ax.scatter(pf[s, 0], pf[s, 1], s=14, color=c, alpha=0.55, lw=0, label="FP")
            ax.scatter(
                pq[s, 0], pq[s, 1], s=14, marker="x", color="#222222", lw=0.8, alpha=0.8, label="quantized"
            )
            ax.set_title(f"{m}: {int(s.sum())} tokens, mean cos {cos[s].mean():.4f}", color=c, fontsize=9)
            ax.set_xlabel("PC 1 (of FP)")
            ax.grid(True)
        axes[0].set_ylabel("PC 2 (of FP)")
        for ax in axes[n:]:
            ax.set_visible(False)
        axes[0].legend(fontsize=7, loc="best", markerscale=1.2)
        _adjust(fig, left=0.7, right=0.15, top=0.4, bottom=0.55, wspace=0.06, hspace=0.45)
        return _save(fig, path)
