"""The data layer: audio sources decoded to mono at a rate (`audio`), data sources read into rows (`sources`), label
cells turned into names and targets (`labels`). Training, evaluation, the search index and the command line all
read their data through it."""

from .audio import AudioDecodeError, decode_audio
from .labels import LabelReader, class_names, encode_targets
from .sources import DataSource, source_kind


__all__ = [
    "AudioDecodeError",
    "DataSource",
    "LabelReader",
    "class_names",
    "decode_audio",
    "encode_targets",
    "source_kind",
]
