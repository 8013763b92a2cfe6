"""Corpora that ship with the repository: source files copied once, checked on every read.

A corpus is a folder holding MANIFEST.json and the files it lists, each stored at
`third_party/<package>-<version>/<path inside the distribution>` beside that
distribution's licence files. `third_party` keeps linters and duplicate finders off code
that is not ours, and the '-' and '.' of `<package>-<version>` keep the files from ever
being importable as modules of `configs`. The manifest's `files` are read in their order
(the order is part of the data: the split and the byte caps follow it), each with the
`repo`, `path` and `license` its records carry and its sha256, which every read checks:
the data cannot drift with whatever happens to be installed, and an edited file is an
error, not new data.

Source spec `corpus:NAME[/ORGANIZATION]` (collab/data/sources.py): NAME is a corpus under
configs/corpus/ (found beside the collab package, never from the working directory) or an
absolute path to a corpus folder; ORGANIZATION keeps the files the manifest lists for it.
`fingerprint` is the corpus's content identity (the data card records it per source).
configs/corpus/vendor.py writes the default study's corpus from installed packages.
"""

import hashlib
import json
import os

MANIFEST = 'MANIFEST.json'
# Beside the collab package: the repository's configs/corpus, or site-packages/configs/
# corpus when configs is installed with its package data (setup.cfg).
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), 'configs', 'corpus')
_REQUIRED = ('organization', 'package', 'version', 'file', 'repo', 'path', 'license',
             'sha256')
_REFRESH = 'python -m configs.corpus.vendor'


class CorpusError(ValueError):
  """A corpus that is missing, malformed, or whose files differ from its manifest."""


def locate(arg: str) -> tuple[str, str]:
  """'default/psf' -> (the corpus folder, 'psf'); 'default' -> (folder, '')."""
  path = os.path.normpath(arg if os.path.isabs(arg) else os.path.join(ROOT, arg))
  if os.path.isfile(os.path.join(path, MANIFEST)):
    return path, ''
  parent, organization = os.path.split(path)
  if os.path.isfile(os.path.join(parent, MANIFEST)):
    return parent, organization
  raise CorpusError(f'Source corpus:{arg}: no {MANIFEST} in {path} or its parent; name a '
                    f'corpus under {ROOT} (or an absolute path to one), optionally '
                    'followed by /ORGANIZATION.')


def _checked_entry(entry, where: str) -> dict:
  """An entry of `files` with every field, stored inside the corpus folder."""
  missing = [k for k in _REQUIRED if not isinstance(entry, dict)
             or not isinstance(entry.get(k), str)]
  if missing:
    raise CorpusError(f'{where}: a file entry lacks {missing}; rewrite the manifest with '
                      f'{_REFRESH}.')
  stored = os.path.normpath(entry['file'])
  if os.path.isabs(stored) or stored.split(os.sep)[0] == '..':
    raise CorpusError(f"{where}: file {entry['file']!r} lies outside the corpus folder; "
                      f'rewrite the manifest with {_REFRESH}.')
  return entry


def load(folder: str) -> list[dict]:
  """The manifest's file entries, in read order."""
  where = os.path.join(folder, MANIFEST)
  try:
    with open(where, encoding='utf-8') as f:
      files = json.load(f)['files']
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CorpusError(f'{where}: unreadable manifest ({e!r}); restore it from git or '
                      f'rewrite it with {_REFRESH}.') from None
  if not isinstance(files, list):
    raise CorpusError(f'{where}: `files` is not a list; rewrite it with {_REFRESH}.')
  return [_checked_entry(e, where) for e in files]


def entries(arg: str) -> tuple[str, list[dict]]:
  """(corpus folder, the entries `corpus:ARG` reads, in manifest order)."""
  folder, organization = locate(arg)
  files = load(folder)
  if organization:
    files = [e for e in files if e['organization'] == organization]
    if not files:
      known = sorted({e['organization'] for e in load(folder)})
      raise CorpusError(f'Source corpus:{arg}: the manifest lists no files for '
                        f'{organization!r}; its organizations are {known}.')
  return folder, files


def read(folder: str, entry: dict) -> bytes:
  """A stored file's bytes, after checking them against the manifest's sha256."""
  full = os.path.join(folder, entry['file'])
  advice = (f'restore the shipped file (git checkout -- {full}) or, to change the corpus on '
            f'purpose, rewrite it with {_REFRESH}.')
  try:
    with open(full, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise CorpusError(f'{full}: cannot read this corpus file ({e.strerror}); '
                      f'{advice}') from None
  digest = hashlib.sha256(data).hexdigest()
  if digest != entry['sha256']:
    raise CorpusError(f"{full}: sha256 {digest[:12]}... differs from {MANIFEST}'s "
                      f"{entry['sha256'][:12]}...; {advice}")
  return data


def fingerprint(files: list[dict]) -> str:
  """sha256 of the entries' sorted per-file sha256s: the content they hold, as a set."""
  return hashlib.sha256(''.join(sorted(e['sha256'] + '\n' for e in files)).encode()
                        ).hexdigest()


def versions(files: list[dict]) -> dict[str, str]:
  """package -> version of the distributions the entries were copied from."""
  return {e['package']: e['version'] for e in files}
