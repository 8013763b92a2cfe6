"""Where each participant's code comes from: installed packages, the stdlib, folders, JSON lines.

A source spec is one string:
  `pkg:NAME`    the `.py` files of an installed distribution (importlib.metadata);
                repo = "NAME==VERSION".
  `stdlib`      the standard library's `.py` files (site-/dist-packages excluded);
                repo = "stdlib/<first-level package>" ("stdlib" for top-level modules).
  `dir:PATH`    every `.py` file under a folder; repo = the first-level subfolder, so a
                folder of cloned repositories just works.
  `jsonl:PATH`  the paper's release format: gzipped or plain JSON lines with `repo_name,
                path, content, license` (optional `copies, size` are ignored). PATH may be
                a glob, e.g. `jsonl:data/google_*.json.gz`.

Every source yields records `{participant, repo, path, content, license}` in a
deterministic order. Files that are binary (a NUL byte), not UTF-8, larger than
`max_file_bytes`, unreadable, or reached through a symlink loop are skipped and counted in
a `collections.Counter` the caller passes in, so they end up in the data card.
"""

import collections
import errno
import glob
import gzip
import hashlib
import importlib.metadata
import json
import os
import platform
import sysconfig
from typing import Iterator

import tqdm

SKIP_REASONS = ('binary', 'non_utf8', 'oversized', 'unreadable', 'symlink_loop',
                'symlink_duplicate')
_JSONL_REQUIRED = ('repo_name', 'path', 'content')
_STDLIB_EXCLUDED = ('site-packages', 'dist-packages')


class SourceError(ValueError):
  """A source spec that names nothing usable (unknown kind, package or path)."""


class SourceNotFoundError(SourceError, FileNotFoundError):
  """A `dir:` or `jsonl:` path that does not exist."""


def parse_source(spec: str) -> tuple[str, str]:
  """'pkg:jax' -> ('pkg', 'jax'); 'stdlib' -> ('stdlib', '')."""
  if spec == 'stdlib':
    return 'stdlib', ''
  kind, sep, arg = spec.partition(':')
  if not sep or kind not in ('pkg', 'dir', 'jsonl') or not arg:
    raise SourceError(f'Unknown source {spec!r}: use pkg:NAME, stdlib, dir:PATH or '
                      'jsonl:PATH.')
  return kind, arg


def _distribution(name: str) -> importlib.metadata.Distribution:
  try:
    return importlib.metadata.distribution(name)
  except importlib.metadata.PackageNotFoundError:
    raise SourceError(f'Source pkg:{name}: no installed distribution named {name!r}; '
                      f'install it (pip install {name}) or remove it from the '
                      'participant\'s sources.') from None


def _license(meta) -> str:
  """SPDX expression, short License field, or the OSI classifier; '' when unknown."""
  if meta.get('License-Expression'):
    return meta['License-Expression']
  text = (meta.get('License') or '').strip()
  if text and '\n' not in text and len(text) <= 64:
    return text
  for classifier in meta.get_all('Classifier') or ():
    if classifier.startswith('License ::'):
      return classifier.split('::')[-1].strip()
  return ''


def _pkg_files(name: str) -> Iterator[tuple[str, str, str, str]]:
  """(absolute path, repo, path, license) of a distribution's .py files, sorted."""
  dist = _distribution(name)
  repo = f"{dist.metadata['Name']}=={dist.version}"
  license_ = _license(dist.metadata)
  files = sorted(str(f) for f in dist.files or () if f.suffix == '.py')
  for rel in files:
    yield str(dist.locate_file(rel)), repo, rel, license_


def stdlib_dir() -> str:
  return sysconfig.get_paths()['stdlib']


def _walk_py(top: str, skipped: collections.Counter, excluded=()) -> Iterator[str]:
  """Sorted .py paths under `top`, following directory symlinks once (loops skipped)."""
  seen = set()
  for root, dirnames, filenames in os.walk(top, followlinks=True):
    st = os.stat(root)
    seen.add((st.st_dev, st.st_ino))
    kept = []
    # Real folders claim their inode before links to them do, so a link is the duplicate.
    for d in sorted(dirnames, key=lambda d: (os.path.islink(os.path.join(root, d)), d)):
      if d in excluded:
        continue
      full = os.path.join(root, d)
      try:
        st = os.stat(full)
      except OSError as e:
        skipped['symlink_loop' if e.errno == errno.ELOOP else 'unreadable'] += 1
        continue
      if (st.st_dev, st.st_ino) in seen:
        # A link back to an ancestor is a loop; a second way into a visited folder is not.
        ancestor = (os.path.realpath(root) + os.sep).startswith(
            os.path.realpath(full) + os.sep)
        skipped['symlink_loop' if ancestor else 'symlink_duplicate'] += 1
        continue
      seen.add((st.st_dev, st.st_ino))
      kept.append(d)
    dirnames[:] = sorted(kept)
    for f in sorted(filenames):
      if f.endswith('.py'):
        yield os.path.join(root, f)


def _dir_files(top: str, skipped, prefix: str = '', excluded=()):
  """(absolute path, repo, path-in-repo, '') for .py files; repo = first-level folder."""
  if not os.path.isdir(top):
    raise SourceNotFoundError(f'Source dir:{top}: no such folder; check the path in the '
                              'participant\'s sources.')
  top_name = prefix or os.path.basename(os.path.abspath(top))
  for full in _walk_py(top, skipped, excluded):
    parts = os.path.relpath(full, top).split(os.sep)
    if len(parts) == 1:
      yield full, top_name, parts[0], ''
    else:
      repo = f'{prefix}/{parts[0]}' if prefix else parts[0]
      yield full, repo, '/'.join(parts[1:]), ''


def _stdlib_files(skipped):
  for full, repo, path, _ in _dir_files(stdlib_dir(), skipped, 'stdlib', _STDLIB_EXCLUDED):
    yield full, repo, path, 'PSF-2.0'


def _read_text(full: str, max_file_bytes: int, skipped) -> str | None:
  """The file's text, or None (counted in `skipped`) when it cannot be used."""
  try:
    st = os.stat(full)
    if max_file_bytes and st.st_size > max_file_bytes:
      skipped['oversized'] += 1
      return None
    with open(full, 'rb') as f:
      data = f.read()
  except OSError as e:
    skipped['symlink_loop' if e.errno == errno.ELOOP else 'unreadable'] += 1
    return None
  return _decode(data, skipped)


def _decode(data: bytes, skipped) -> str | None:
  if b'\0' in data:
    skipped['binary'] += 1
    return None
  try:
    return data.decode('utf-8')
  except UnicodeDecodeError:
    skipped['non_utf8'] += 1
    return None


def _jsonl_paths(pattern: str) -> list[str]:
  paths = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
  if not paths or not all(os.path.isfile(p) for p in paths):
    raise SourceNotFoundError(f'Source jsonl:{pattern}: no such file; point it at the '
                              'paper-format .json.gz / .jsonl file(s).')
  return paths


def _open_maybe_gzip(path: str):
  with open(path, 'rb') as f:
    magic = f.read(2)
  return gzip.open(path, 'rb') if magic == b'\x1f\x8b' else open(path, 'rb')


def _jsonl_record(line: bytes, where: str) -> dict:
  """One parsed line; a malformed one raises naming the file and line number."""
  hint = ('each line must be one JSON object with repo_name, path, content and license '
          '(the paper\'s release format).')
  try:
    row = json.loads(line)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise SourceError(f'{where}: malformed JSON line ({e}); {hint}') from None
  if not isinstance(row, dict):
    raise SourceError(f'{where}: expected a JSON object; {hint}')
  missing = [k for k in _JSONL_REQUIRED if not isinstance(row.get(k), str)]
  if missing:
    raise SourceError(f'{where}: missing or non-string field(s) {missing}; {hint}')
  return row


def _iter_jsonl(pattern: str, participant: str, max_file_bytes: int, skipped):
  for path in _jsonl_paths(pattern):
    try:
      with _open_maybe_gzip(path) as f:
        for lineno, line in enumerate(f, start=1):
          if not line.strip():
            continue
          row = _jsonl_record(line, f'{path}, line {lineno}')
          content = row['content']
          try:
            size = len(content.encode('utf-8'))
          except UnicodeEncodeError:  # Lone surrogates from a \ud800 escape.
            skipped['non_utf8'] += 1
            continue
          if max_file_bytes and size > max_file_bytes:
            skipped['oversized'] += 1
          elif '\0' in content:
            skipped['binary'] += 1
          else:
            yield _record(participant, row['repo_name'], row['path'], content,
                          str(row.get('license') or ''))
    except (OSError, EOFError) as e:
      raise SourceError(f'Source jsonl:{path}: cannot read it ({e}); is it a complete '
                        'gzip or plain JSON-lines file?') from None


def _record(participant, repo, path, content, license_) -> dict:
  return {'participant': participant, 'repo': repo, 'path': path, 'content': content,
          'license': license_}


def _file_list(spec: str, skipped):
  kind, arg = parse_source(spec)
  if kind == 'pkg':
    return _pkg_files(arg)
  if kind == 'stdlib':
    return _stdlib_files(skipped)
  return _dir_files(arg, skipped)


def iter_source(spec: str, participant: str, max_file_bytes: int,
                skipped: collections.Counter) -> Iterator[dict]:
  """Records of one source, in a deterministic order; unusable files counted in `skipped`."""
  kind, arg = parse_source(spec)
  if kind == 'jsonl':
    yield from _iter_jsonl(arg, participant, max_file_bytes, skipped)
    return
  for full, repo, path, license_ in _file_list(spec, skipped):
    content = _read_text(full, max_file_bytes, skipped)
    if content is not None:
      yield _record(participant, repo, path, content, license_)


def read_participant(name: str, sources, max_file_bytes: int,
                     progress: bool = True) -> tuple[list[dict], collections.Counter]:
  """All records of one participant's sources, and the counts of skipped files."""
  if not sources:
    raise SourceError(f'Participant {name!r} has no sources; give it pkg:, stdlib, dir: '
                      'or jsonl: sources.')
  skipped = collections.Counter({k: 0 for k in SKIP_REASONS})
  records = []
  bar = tqdm.tqdm(desc=f'{name}: reading', unit=' files', disable=not progress)
  for spec in sources:
    for record in iter_source(spec, name, max_file_bytes, skipped):
      records.append(record)
      bar.update()
  bar.close()
  return records, skipped


def package_versions(sources) -> dict[str, str]:
  """Versions of the installed packages (and Python, for stdlib) a participant reads."""
  versions = {}
  for spec in sources:
    kind, arg = parse_source(spec)
    if kind == 'pkg':
      versions[arg] = _distribution(arg).version
    elif kind == 'stdlib':
      versions['python'] = platform.python_version()
  return versions


def source_fingerprint(spec: str) -> str:
  """sha256 of what a source would read (names, sizes, mtimes): cheap change detection."""
  h = hashlib.sha256(spec.encode())
  kind, arg = parse_source(spec)
  if kind == 'jsonl':
    listing = [(p, '') for p in _jsonl_paths(arg)]
  else:
    listing = [(full, repo + '/' + path) for full, repo, path, _ in
               _file_list(spec, collections.Counter())]
  h.update(json.dumps(package_versions([spec]), sort_keys=True).encode())
  for full, name in listing:
    try:
      st = os.stat(full)
      h.update(f'{name or full}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode())
    except OSError:
      h.update(f'{name or full}\0missing\n'.encode())
  return h.hexdigest()
