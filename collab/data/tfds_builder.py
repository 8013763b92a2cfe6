"""The cleaned files as a TFDS dataset (array_record, no TensorFlow needed).

One dataset, `collab_code`, with a split per participant and side, `{participant}_train`
and `{participant}_valid`; each example is `{repo, path, content, license}` (text), in
the order the pipeline produced them (shuffling disabled). A split is given as records or
as a function returning an iterable of them, so the build can stream each split's files
from its sources instead of holding them. Read back with
`load_split(data_dir, participant, split)`, a random-access sequence of str dicts.
"""

import os
import shutil
from typing import Callable, Iterable, Sequence, Union

import tensorflow_datasets as tfds

FIELDS = ('repo', 'path', 'content', 'license')
NAME = 'collab_code'
VERSION = '1.0.0'
# A split's records, or a function returning them (called once, when the split is written).
Records = Union[Iterable[dict], Callable[[], Iterable[dict]]]


class CollabCode(tfds.core.GeneratorBasedBuilder):
  """Code files of every participant; built from the splits handed to the constructor."""

  VERSION = tfds.core.Version(VERSION)
  # No checksums file to look up next to this module; TFDS's lookup would otherwise need
  # the optional `importlib_resources` package for a builder defined inside a package.
  code_path = None

  def __init__(self, *, splits: dict[str, Records], **kwargs):
    self._splits = splits
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    features = tfds.features.FeaturesDict({k: tfds.features.Text() for k in FIELDS})
    return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True,
                                 description='Cleaned Python files per participant.')

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the records come from the splits given.
    return {name: self._generate_examples(records) for name, records in self._splits.items()}

  def _generate_examples(self, records: Records):
    for i, r in enumerate(records() if callable(records) else records):
      yield i, {k: r[k] for k in FIELDS}


def write_tfds(splits: dict[str, Records], tfds_dir: str) -> str:
  """Writes the dataset under `tfds_dir`; returns the folder of its version."""
  builder = CollabCode(splits=splits, data_dir=tfds_dir, file_format='array_record')
  downloads = os.path.join(tfds_dir, 'downloads')
  builder.download_and_prepare(download_dir=downloads)
  shutil.rmtree(downloads, ignore_errors=True)
  return str(builder.data_dir)


class CodeRecords(Sequence):
  """Random access over one split, decoding TFDS bytes into str."""

  def __init__(self, source):
    self._source = source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    if index < 0:
      index += len(self)
    if not 0 <= index < len(self):
      raise IndexError(f'index {index} out of range for {len(self)} records')
    return {k: v.decode('utf-8') for k, v in self._source[index].items()}


def load_split(data_dir: str, participant: str, split: str) -> CodeRecords:
  """`{repo, path, content, license}` records of `{participant}_{split}`."""
  folder = os.path.join(data_dir, 'tfds', NAME, VERSION)
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'No TFDS dataset under {data_dir!r}; build the data first: '
                            'python -m launch.build_data --config=YOUR_CONFIG '
                            '--data_dir=DIR')
  builder = tfds.builder_from_directory(folder)
  name = f'{participant}_{split}'
  if name not in builder.info.splits:
    raise ValueError(f'No split {name!r} in {data_dir!r}; it has '
                     f'{sorted(builder.info.splits)}.')
  return CodeRecords(builder.as_data_source(split=name))
