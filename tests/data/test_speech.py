"""Speech: WAV reading/resampling, alsa-utils clips and espeak-ng TTS (skipped without the apt packages)."""

from __future__ import annotations

import shutil
import wave

import numpy as np
import pytest

from morphoquant.data import DataError, MissingToolError, speech


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MORPHOQUANT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def write_wav(path, x, sr, channels=1):
    pcm = (np.clip(x, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes(pcm.tobytes())


def test_transcript_from_filename():
    assert speech.transcript_from_filename("/usr/share/sounds/alsa/Front_Center.wav") == "front center"
    assert speech.transcript_from_filename("Rear_Left.wav") == "rear left"


def test_read_wav_resamples_and_downmixes(tmp_path):
    t = np.arange(48000) / 48000
    tone = 0.5 * np.sin(2 * np.pi * 440 * t)
    write_wav(tmp_path / "s.wav", np.stack([tone, tone], 1).reshape(-1), 48000, channels=2)
    x, sr = speech.read_wav(tmp_path / "s.wav")
    assert sr == 16000 and x.dtype == np.float32 and len(x) == 16000
    spec = np.abs(np.fft.rfft(x))
    assert abs(np.argmax(spec) - 440) <= 1  # 1 Hz bins: the tone survives resampling
    raw, sr0 = speech.read_wav(tmp_path / "s.wav", sample_rate=None)
    assert sr0 == 48000 and len(raw) == 48000


def test_read_wav_corrupt(tmp_path):
    (tmp_path / "junk.wav").write_bytes(b"RIFF\x00\x00")
    with pytest.raises(DataError, match="junk.wav"):
        speech.read_wav(tmp_path / "junk.wav")
    write_wav(tmp_path / "cut.wav", np.zeros(1000), 16000)
    data = (tmp_path / "cut.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[:-500])
    with pytest.raises(DataError, match="cut.wav"):
        speech.read_wav(tmp_path / "cut.wav")
    with pytest.raises(DataError, match="does not exist"):
        speech.read_wav(tmp_path / "nope.wav")


def test_alsa_clips_missing_dir(tmp_path):
    with pytest.raises(MissingToolError, match="alsa-utils"):
        speech.alsa_clips(directory=tmp_path)


@pytest.mark.skipif(not speech.ALSA_DIR.is_dir(), reason="apt package alsa-utils not installed")
def test_alsa_clips_real():
    clips = speech.alsa_clips()
    assert len(clips) == 8
    assert clips[0].transcript == "front center" and "noise" not in {c.transcript for c in clips}
    for c in clips:
        assert c.sample_rate == 16000 and c.waveform.dtype == np.float32
        assert 0.9 < len(c.waveform) / 16000 < 2.0 and np.abs(c.waveform).max() > 0.05


def test_tts_missing_binary(cache, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(MissingToolError, match="apt-get install espeak-ng"):
        speech.tts("hello", cache=False)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="apt package espeak-ng not installed")
def test_tts_real_and_cached(cache, monkeypatch):
    x, sr = speech.tts("-the quick brown fox")  # a leading dash must not be read as an option
    assert sr == 16000 and x.dtype == np.float32 and 0.5 < len(x) / sr < 5 and np.abs(x).max() > 0.05
    assert len(list((cache / "tts").glob("*.npy"))) == 1
    monkeypatch.setattr(shutil, "which", lambda name: None)  # a cache hit needs no espeak-ng
    y, _ = speech.tts("-the quick brown fox")
    np.testing.assert_array_equal(x, y)
    with pytest.raises(DataError, match="non-empty"):
        speech.tts("  ")


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="apt package espeak-ng not installed")
def test_tts_bad_voice(cache):
    with pytest.raises(DataError, match="voice"):
        speech.tts("hello", voice="xx-no-such-voice", cache=False)
