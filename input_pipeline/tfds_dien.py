"""A tensorflow-datasets builder, `din_amazon`, over the DIEN preparation of Amazon reviews.

TFDS is the catalogue and browsing front door: `tfds.builder('din_amazon/books', ...)` documents the
data, prepares it once, and `tfds.data_source(...)` gives random access to readable examples (token
strings next to their vocabulary ids) for notebooks. Training does not read these records; it keeps
reading the numpy column cache of `input_pipeline.dien` (record-by-record reading runs at thousands of
examples/s, the column cache at millions).

The builder runs the very code training runs: the built-in data through `datasets.builtin_data_dir`
(synthetic generator + `amazon.prepare`), the real categories through `amazon.prepare`, both into
`<download_dir>/din_amazon_prepared/<config>` (download_dir defaults to `<data_dir>/downloads`); then
examples come from `dien.load_vocabularies` and `dien.load_split` on that directory, so every
example's ids equal the training arrays row by row, and that directory trains as it is
(`--config.dataset=dien --config.data_dir=...`).

Configs: `books` and `electronics` read the raw McAuley 2014 files from the manual dir (see
MANUAL_DOWNLOAD_INSTRUCTIONS); `synthetic` generates a small built-in data set in seconds, and
`synthetic_every_event` prepares it with a pair per event (`samples='every_event'`, the
`input_pipeline.events` storage). Another size or mode is a config away:
`DinAmazonConfig(name=..., spec=SyntheticSpec(num_users=100_000), samples='every_event')`.
Examples keep the order of the samples (shuffling disabled); example i of a split is sample i, line i + 1
of `local_train_splitByUser` / `local_test_splitByUser` (or `python -m input_pipeline.inspect` line i + 1). Needs `tensorflow-datasets` and
`array-record`, not TensorFlow.

    import input_pipeline.tfds_dien  # registers din_amazon
    train = tfds.data_source('din_amazon/synthetic', split='train', data_dir='/tmp/tfds')
"""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from input_pipeline import amazon, datasets, dien, inspect, synthetic
from input_pipeline.errors import bad_file

SPLITS = ("train", "test")
RAW_URL = "https://jmcauley.ucsd.edu/data/amazon/"
CATEGORY_FILES_URL = "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/"
PREPARED_DIR = "din_amazon_prepared"


@dataclasses.dataclass(eq=False)
class DinAmazonConfig(tfds.core.BuilderConfig):
    """One data set: a McAuley category read from the manual dir, or a synthetic spec."""

    category: str = ""  # McAuley category of the manual files ('Books'); '' for synthetic data
    spec: synthetic.SyntheticSpec | None = None  # the generator's sizes; None for manual files
    seed: int = 0  # generator seed (synthetic only)
    prepare_seed: int = 3  # amazon.prepare seed: negative sampling and train/test split
    samples: str = "last_event"  # amazon.prepare's sample mode: DIEN's pair per user, or a pair per event

    def raw_files(self) -> tuple[str, str]:
        """The review and meta file names expected in the manual dir."""
        return f"reviews_{self.category}_5.json.gz", f"meta_{self.category}.json.gz"


SMALL_SYNTHETIC = synthetic.SyntheticSpec(num_users=2_000, num_items=600, num_categories=40)


class DinAmazon(tfds.core.GeneratorBasedBuilder):
    """DIN/DIEN samples (label, user, target item and category, click history) from Amazon reviews."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "DIEN preparation of input_pipeline.amazon; strings and vocabulary ids."}
    BUILDER_CONFIGS = [
        DinAmazonConfig(name="books", category="Books",
                        description="Amazon 2014 Books 5-core reviews + meta (DeepRec's DIN benchmark)."),
        DinAmazonConfig(name="electronics", category="Electronics",
                        description="Amazon 2014 Electronics 5-core reviews + meta."),
        DinAmazonConfig(name="synthetic", spec=SMALL_SYNTHETIC,
                        description="Small built-in Amazon-like data (input_pipeline.synthetic); no downloads."),
        DinAmazonConfig(name="synthetic_every_event", spec=SMALL_SYNTHETIC, samples="every_event",
                        description="The small built-in data with a sample pair per event (input_pipeline.events)."),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
    The `books` and `electronics` configs need the Amazon review data of McAuley et al. (2014),
    which is not redistributed: get the category's 5-core review file and meta file from
    {RAW_URL} (direct links under {CATEGORY_FILES_URL}) and put both, named as downloaded,
    in the manual dir: `<data_dir>/downloads/manual/` unless
    `download_config=tfds.download.DownloadConfig(manual_dir=...)` names another.

    * books: `reviews_Books_5.json.gz` and `meta_Books.json.gz`
    * electronics: `reviews_Electronics_5.json.gz` and `meta_Electronics.json.gz`

    The `synthetic` config needs no files.
    """

    def __init__(self, *, file_format: str | tfds.core.FileFormat = "array_record", **kwargs):
        """A builder writing array_record files, the format `tfds.data_source` reads without TensorFlow."""
        super().__init__(file_format=file_format, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        """Features: the sample-file strings and their vocabulary ids."""
        text = tfds.features.Text()
        ids = tfds.features.Tensor(shape=(None,), dtype=np.int64)
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "label": tfds.features.ClassLabel(names=["no_click", "click"]),
                "uid": text,
                "mid": text,
                "cat": text,
                "hist_mids": tfds.features.Sequence(text),  # oldest first
                "hist_cats": tfds.features.Sequence(text),
                "uid_id": np.int64,  # ids from uid_voc / mid_voc / cat_voc; unknown tokens are 0
                "mid_id": np.int64,
                "cat_id": np.int64,
                "hist_mid_ids": ids,
                "hist_cat_ids": ids,
            }),
            disable_shuffling=True,  # keep the sample files' order: example i = line i + 1
            homepage=RAW_URL,
            citation=_CITATION,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        """Prepares the DIEN directory under the download dir; one generator per split."""
        out_dir = os.fspath(dl_manager.download_dir / PREPARED_DIR / self.builder_config.name)
        config = self.builder_config
        if config.spec is not None:
            datasets.builtin_data_dir(out_dir, config.spec, config.seed, config.prepare_seed, config.samples)
        else:
            reviews, meta = (_manual_file(dl_manager.manual_dir, name) for name in config.raw_files())
            amazon.prepare(reviews, meta, out_dir, seed=config.prepare_seed, samples=config.samples)
        vocabs = dien.load_vocabularies(out_dir)
        return {split: self._generate_examples(out_dir, split, vocabs) for split in SPLITS}

    def _generate_examples(self, data_dir: str, split: str,
                           vocabs: dien.Vocabularies) -> Iterator[tuple[int, dict]]:
        """(sample index, example) per sample, in any stored format: tokens from `inspect.samples`, ids from
        `dien.load_split`."""
        encoded = dien.load_split(data_dir, split, vocabs)
        for index, sample in inspect.samples(data_dir, split):
            history = slice(encoded.hist_start[index], encoded.hist_start[index] + encoded.hist_lengths[index])
            yield index, {
                "label": sample.label,
                "uid": sample.uid,
                "mid": sample.mid,
                "cat": sample.cat,
                "hist_mids": sample.hist_mids,
                "hist_cats": sample.hist_cats,
                "uid_id": int(encoded.uid[index]),
                "mid_id": int(encoded.mid[index]),
                "cat_id": int(encoded.cat[index]),
                "hist_mid_ids": encoded.hist_mids[history].astype(np.int64),
                "hist_cat_ids": encoded.hist_cats[history].astype(np.int64),
            }


def _manual_file(manual_dir, name: str) -> str:
    """The path of `name` in the manual dir, or a DataError saying where to get and put it."""
    path = manual_dir / name
    if not path.exists():
        raise bad_file(path, "missing from the manual dir",
                       f"download {name} from {CATEGORY_FILES_URL} (see {RAW_URL}) into {manual_dir}")
    return os.fspath(path)


_CITATION = """\
@inproceedings{zhou2018din,
  title={Deep Interest Network for Click-Through Rate Prediction},
  author={Zhou, Guorui and Zhu, Xiaoqiang and Song, Chenru and Fan, Ying and Zhu, Han and Ma, Xiao and
          Yan, Yanghui and Jin, Junqi and Li, Han and Gai, Kun},
  booktitle={KDD},
  year={2018}
}
@inproceedings{mcauley2015image,
  title={Image-based Recommendations on Styles and Substitutes},
  author={McAuley, Julian and Targett, Christopher and Shi, Qinfeng and van den Hengel, Anton},
  booktitle={SIGIR},
  year={2015}
}
"""
