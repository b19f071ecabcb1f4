"""Offline speech: real human speech clips from Debian's ``alsa-utils`` and unlimited text-to-speech via
``espeak-ng``, as float32 mono waveforms at 16 kHz (Whisper's rate).

- :func:`alsa_clips`: the 8 spoken channel names in ``/usr/share/sounds/alsa`` ("Front Center", ...) with
  transcripts taken from their file names (``Noise.wav`` holds no speech and is left out);
- :func:`tts`: any sentence synthesised by ``espeak-ng`` and resampled to 16 kHz, cached on disk.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import tempfile
import wave
from dataclasses import dataclass
from math import gcd
from pathlib import Path

import numpy as np

from .errors import DataError, MissingToolError

__all__ = [
    "ALSA_DIR",
    "SAMPLE_RATE",
    "SpeechClip",
    "alsa_clips",
    "read_wav",
    "resample",
    "transcript_from_filename",
    "tts",
    "tts_cache_dir",
]

SAMPLE_RATE = 16000
ALSA_DIR = Path("/usr/share/sounds/alsa")
_NON_SPEECH = {"Noise.wav"}


@dataclass(frozen=True)
class SpeechClip:
    """A speech recording with its reference transcript."""

    name: str
    path: Path
    transcript: str
    waveform: np.ndarray  # float32, mono, in [-1, 1]
    sample_rate: int


def transcript_from_filename(path: Path | str) -> str:
    """The words spoken in an alsa-utils clip, from its file name:
    ``Front_Center.wav`` → ``"front center"``."""
    return " ".join(Path(path).stem.replace("-", "_").split("_")).lower().strip()


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Polyphase resampling of a 1-D signal from ``sr_in`` to ``sr_out`` Hz (float32 out)."""
    x = np.asarray(x, dtype=np.float32)
    if sr_in == sr_out:
        return x
    from scipy.signal import resample_poly

    g = gcd(int(sr_in), int(sr_out))
    return resample_poly(x, sr_out // g, sr_in // g).astype(np.float32)


def _decode_wav(data: bytes, name: str) -> tuple[np.ndarray, int]:
    try:
        with wave.open(io.BytesIO(data)) as w:
            n_ch, width, sr, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            raw = w.readframes(n)
    except (wave.Error, EOFError, struct.error) as e:
        raise DataError(f"audio file {name} is corrupt or not a PCM WAV file ({e})") from e
    if len(raw) != n * n_ch * width or n == 0:
        raise DataError(f"audio file {name} is truncated or empty ({len(raw)} of {n * n_ch * width} bytes)")
    if width == 1:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v)).astype(np.float32) / float(1 << 23)
    elif width == 4:
        x = np.frombuffer(raw, "<i4").astype(np.float32) / float(1 << 31)
    else:
        raise DataError(f"audio file {name} has unsupported sample width {width} bytes")
    x = x.reshape(-1, n_ch).mean(axis=1) if n_ch > 1 else x
    return x.astype(np.float32), sr


def read_wav(path: Path | str, sample_rate: int | None = SAMPLE_RATE) -> tuple[np.ndarray, int]:
    """Reads a PCM WAV file as a float32 mono waveform, resampled to ``sample_rate`` (None keeps the file's
    rate).  Returns ``(waveform, rate)``; a missing or corrupt file raises :class:`DataError` naming it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise DataError(f"audio file {path} does not exist") from e
    x, sr = _decode_wav(data, str(path))
    if sample_rate is not None and sr != sample_rate:
        x, sr = resample(x, sr, sample_rate), sample_rate
    return x, sr


def alsa_clips(sample_rate: int = SAMPLE_RATE, directory: Path | str | None = None) -> list[SpeechClip]:
    """The 8 real speech clips of alsa-utils (``Front_Center.wav`` ... ``Side_Right.wav``), sorted by name, at
    ``sample_rate`` Hz, with lower-case transcripts derived from the file names."""
    root = Path(directory) if directory is not None else ALSA_DIR
    files = sorted(p for p in root.glob("*.wav") if p.name not in _NON_SPEECH) if root.is_dir() else []
    if not files:
        raise MissingToolError(
            f"no speech clips in {root}: install the Debian package alsa-utils (`apt-get install alsa-utils`)"
        )
    out = []
    for p in files:
        x, sr = read_wav(p, sample_rate)
        out.append(SpeechClip(p.stem, p, transcript_from_filename(p), x, sr))
    return out


def tts_cache_dir() -> Path:
    """Where synthesised speech is cached: ``<MorphoQuant cache>/tts``."""
    from ..zoo.fetch import cache_dir

    path = cache_dir() / "tts"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise MissingToolError(
            "espeak-ng is not installed (needed for text-to-speech): install the Debian "
            "package espeak-ng (`apt-get install espeak-ng`)"
        )
    return exe


def tts(
    text: str, voice: str = "en", speed: int = 160, sample_rate: int = SAMPLE_RATE, cache: bool = True
) -> tuple[np.ndarray, int]:
    """Speaks ``text`` with ``espeak-ng`` (``voice``, ``speed`` in words per minute) and returns
    ``(float32 mono waveform at sample_rate, sample_rate)``.

    Results are cached on disk under :func:`tts_cache_dir`, keyed by a hash of (text, voice, speed,
    sample_rate), so repeated calls are free and identical.
    """
    if not isinstance(text, str) or not text.strip():
        raise DataError("tts() needs a non-empty text")
    key = hashlib.sha256(json.dumps([text, voice, int(speed), int(sample_rate)]).encode()).hexdigest()[:32]
    cached = tts_cache_dir() / f"{key}.npy" if cache else None
    if cached is not None and cached.is_file():
        try:
            return np.load(cached).astype(np.float32, copy=False), sample_rate
        except (ValueError, OSError, EOFError):
            cached.unlink(missing_ok=True)  # damaged cache entry: synthesise again
    exe = _espeak()
    with tempfile.TemporaryDirectory(prefix="mq-tts-") as tmp:
        wav = Path(tmp) / "out.wav"
        # Text goes through stdin so that text starting with "-" is never taken for an option.
        proc = subprocess.run(
            [exe, "--stdin", "-v", voice, "-s", str(int(speed)), "-w", str(wav)],
            check=False,
            input=text,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0 or not wav.is_file():
            raise DataError(
                f"espeak-ng failed for voice {voice!r} (rc={proc.returncode}): "
                f"{proc.stderr.strip() or proc.stdout.strip()}; `espeak-ng --voices` lists voices"
            )
        x, sr = read_wav(wav, sample_rate)
    if cached is not None:
        fd, part = tempfile.mkstemp(prefix=".tmp-", suffix=".npy", dir=cached.parent)
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, x)
        os.replace(part, cached)
    return x, sr
