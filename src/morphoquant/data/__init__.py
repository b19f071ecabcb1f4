"""Offline data loaders: real text, images, VQA and speech that need no model hub or data-set download.

- :mod:`.wiki` — English Wikipedia extracts with fixed, disjoint calibration / evaluation splits;
- :mod:`.images` — real photos bundled with scikit-image;
- :mod:`.vqa` — the easy-VQA question-answering set;
- :mod:`.speech` — alsa-utils speech clips and espeak-ng text-to-speech at 16 kHz.

All loaders raise :class:`DataError` (a ``ValueError``) naming the problem and the fix.
"""

from .errors import DataError, MissingToolError
from .images import NamedImage, load_image, photo_names, real_images
from .speech import SpeechClip, alsa_clips, read_wav, resample, transcript_from_filename, tts
from .vqa import VQASample, answer_vocab, vqa_split
from .wiki import calibration_windows, evaluation_windows, split_keys, wiki_text, wiki_texts, wiki_tokens

__all__ = [
    "DataError",
    "MissingToolError",
    "NamedImage",
    "SpeechClip",
    "VQASample",
    "alsa_clips",
    "answer_vocab",
    "calibration_windows",
    "evaluation_windows",
    "load_image",
    "photo_names",
    "read_wav",
    "real_images",
    "resample",
    "split_keys",
    "transcript_from_filename",
    "tts",
    "vqa_split",
    "wiki_text",
    "wiki_texts",
    "wiki_tokens",
]
