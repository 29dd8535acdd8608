"""Real data that loads offline: text corpora, image sets, tokenizers, deterministic batches, a dataset registry.

>>> from smoe.data import DataConfig, build_data
>>> data = build_data("lm", DataConfig(dataset="pydoc"), batch_size=4, seq_len=64)
>>> x_BL, y_BL = data.train_batch(0)
>>> tuple(x_BL.shape)
(4, 64)
"""

from smoe.data import images, text  # noqa: F401  (register the datasets)
from smoe.data.batches import ImageData, LMData, step_generator
from smoe.data.build import DataConfig, build_data
from smoe.data.images import ImageSplits
from smoe.data.registry import (
    TASKS,
    DatasetSpec,
    DataUnavailableError,
    default_dataset,
    get_dataset,
    list_datasets,
    load_dataset,
    register_dataset,
)
from smoe.data.text import TextSplits, load_text_file
from smoe.data.tokenizer import BPETokenizer, ByteTokenizer, build_tokenizer, tokenizer_from_dict

__all__ = [
    "TASKS",
    "DataConfig",
    "build_data",
    "LMData",
    "ImageData",
    "step_generator",
    "TextSplits",
    "ImageSplits",
    "load_text_file",
    "DatasetSpec",
    "DataUnavailableError",
    "register_dataset",
    "get_dataset",
    "list_datasets",
    "load_dataset",
    "default_dataset",
    "ByteTokenizer",
    "BPETokenizer",
    "build_tokenizer",
    "tokenizer_from_dict",
]
