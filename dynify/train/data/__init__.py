"""Data sets for calibration, fine-tuning and evaluation, from whatever the user already has.

`load_dataset` accepts an ImageFolder directory, a `.zip` of one (read in place, member by member),
a torchvision data set name, or tensors. Folder and zip share one indexing routine, so the same
images give the same classes, order and labels either way. Files are read right or refused
(`images`): 16-bit and float pixels are scaled, not clipped; oversized images and zip members,
unsafe member names, encrypted entries and symbolic links out of the folder are refused.
Decoding small JPEGs costs more than a small network's epoch on two cores, so
`to_tensor_dataset` decodes once into a uint8 tensor and `random_crop_flip` augments whole
batches of it (`dynify.train.batches` drives the epochs). Text (`text`) becomes one int64 tensor
of token ids, which batches pass to the model unchanged.
"""

from dynify.train.data.datasets import (
    ImageFolderDataset,
    TensorImageDataset,
    ZipImageFolder,
)
from dynify.train.data.images import MAX_IMAGE_PIXELS
from dynify.train.data.layout import IMAGE_EXTENSIONS
from dynify.train.data.loading import DataSource, data_home, load_dataset
from dynify.train.data.splits import LabeledSubset, dataset_targets, split_dataset
from dynify.train.data.tensors import MixedImageSizes, cached_tensor_dataset, to_tensor_dataset
from dynify.train.data.text import TextDataset, Vocabulary, load_text_dataset, tokenize
from dynify.train.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SMALL_IMAGE_MAX,
    Transform,
    make_transforms,
    normalize_batch,
    random_crop_flip,
    transforms_from_weights,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "SMALL_IMAGE_MAX",
    "DataSource",
    "ImageFolderDataset",
    "LabeledSubset",
    "MixedImageSizes",
    "TensorImageDataset",
    "TextDataset",
    "Transform",
    "Vocabulary",
    "ZipImageFolder",
    "cached_tensor_dataset",
    "data_home",
    "dataset_targets",
    "load_dataset",
    "load_text_dataset",
    "make_transforms",
    "normalize_batch",
    "random_crop_flip",
    "split_dataset",
    "to_tensor_dataset",
    "tokenize",
    "transforms_from_weights",
]
