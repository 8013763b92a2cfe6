"""Writes the default study's shipped corpus (configs/corpus/default/) from installed packages.

  python -m configs.corpus.vendor [--out=configs/corpus/default]

A refresh is deliberate: install the versions you want (pip install rich==X ...; the
stdlib file comes from the running Python), set PINS to them, run this, rebuild the
default data and review the diff of MANIFEST.json; the README's numbers change with the
data, so the study runs again. It refuses to run when an installed version differs from
PINS, so the same pins always write the same bytes (no dates, no machine paths).

Each file of SOURCES (the `pkg:`/`stdlib:` specs the default study read before its data
shipped) is copied to `third_party/<package>-<version>/<path inside the distribution>`
with the distribution's licence files: its dist-info `licenses/` (or License-File
metadata) files, a vendored package's only beside its own files; Python's LICENSE.txt for
the stdlib. MANIFEST.json lists them in SOURCES' order with the repo, path and license
their records carry, exactly what the `pkg:`/`stdlib:` source gives, so data built from
`corpus:default/ORGANIZATION` is the data built from SOURCES with the pinned versions
installed: the same records, tokenizer and blocks, byte for byte (tests/test_corpus.py).
"""

import collections
import hashlib
import importlib.metadata
import os
import platform

from absl import app
from absl import flags

from collab import io
from collab.data import corpus
from collab.data import sources

# organization -> the files it contributes, as sources of installed packages. They share
# code as GitHub organizations do, through vendoring: pip (PyPA) vendors requests (PSF)
# and rich (Textualize) and tomli, which the standard library took in as tomllib.
SOURCES = {
    'psf': ('pkg:requests/requests/api.py', 'pkg:requests/requests/hooks.py',
            'pkg:requests/requests/_internal_utils.py', 'pkg:requests/requests/structures.py',
            'pkg:requests/requests/exceptions.py', 'pkg:requests/requests/help.py',
            'stdlib:tomllib/_re.py'),
    'pypa': ('pkg:pip/pip/_vendor/requests/api.py', 'pkg:pip/pip/_vendor/requests/hooks.py',
             'pkg:pip/pip/_vendor/tomli/_re.py', 'pkg:pip/pip/_vendor/rich/control.py',
             'pkg:packaging/packaging/_tokenizer.py', 'pkg:packaging/packaging/errors.py'),
    'textualize': ('pkg:rich/rich/control.py', 'pkg:rich/rich/measure.py',
                   'pkg:rich/rich/_loop.py', 'pkg:rich/rich/color_triplet.py',
                   'pkg:rich/rich/theme.py', 'pkg:rich/rich/containers.py',
                   'pkg:rich/rich/padding.py'),
}
# Held-out files of the same organizations (configs/corpus/heldout): no run trains on
# them; membership inference draws non-member windows from them (collab.study builds
# WORKDIR/data-heldout with the study's tokenizer). Other modules of the same releases,
# none of them vendored by another organization here.
HELDOUT_SOURCES = {
    'psf': ('pkg:requests/requests/auth.py', 'pkg:requests/requests/cookies.py'),
    'pypa': ('pkg:packaging/packaging/requirements.py', 'pkg:packaging/packaging/utils.py',
             'pkg:packaging/packaging/_manylinux.py'),
    'textualize': ('pkg:rich/rich/panel.py', 'pkg:rich/rich/align.py',
                   'pkg:rich/rich/box.py'),
}
CORPORA = {'default': SOURCES, 'heldout': HELDOUT_SOURCES}
# The versions the shipped corpora were copied from ('python': the stdlib's).
PINS = {'requests': '2.34.2', 'pip': '26.3', 'packaging': '26.4', 'rich': '15.0.0',
        'python': '3.11.7'}
# SPDX ids of the packages pip vendors here (pip's own metadata gives only pip's MIT).
VENDORED_LICENSES = {'requests': 'Apache-2.0', 'tomli': 'MIT', 'rich': 'MIT'}

_CORPUS = flags.DEFINE_enum('corpus', 'default', list(CORPORA),
                            'Which corpus: the study\'s training sources or its held-out files.')
_OUT = flags.DEFINE_string('out', '', 'The corpus folder to (re)write; default '
                           'configs/corpus/<corpus>.')


def installed_version(package: str) -> str:
  if package == 'python':
    return platform.python_version()
  return importlib.metadata.version(package)


def check_pins() -> None:
  """Refuses an environment whose versions differ from PINS (one line naming them)."""
  installed = {p: installed_version(p) for p in PINS}
  wrong = {p: v for p, v in installed.items() if v != PINS[p]}
  if wrong:
    raise ValueError(f'Installed {wrong} differ from PINS {PINS}; install the pinned '
                     'versions, or change PINS to refresh the corpus on purpose.')


def _dist_licenses(dist) -> list[tuple[str, str]]:
  """(path inside the distribution, folder whose files it covers; '' for all) of a
  distribution's licence files."""
  names = set(dist.metadata.get_all('License-File') or ())
  out = []
  for f in dist.files or ():
    parts = f.parts
    if not parts[0].endswith('.dist-info'):
      continue
    if parts[1:2] == ('licenses',):
      covered = list(parts[2:-1])
      if covered[:1] == ['src']:  # Sources laid out under src/ install without it.
        covered = covered[1:]
      out.append(('/'.join(parts), '/'.join(covered)))
    elif len(parts) == 2 and parts[1] in names:  # Older metadata: beside METADATA.
      out.append(('/'.join(parts), ''))
  return out


def _vendored(dist, path: str) -> dict | None:
  """What a vendored file (NAME/_vendor/PACKAGE/...) was copied from, per vendor.txt."""
  parts = path.split('/')
  if len(parts) < 3 or parts[1] != '_vendor':
    return None
  package = parts[2].removesuffix('.py')
  listing = dist.locate_file(f'{parts[0]}/_vendor/vendor.txt')
  pins = listing.read_text(encoding='utf-8') if os.path.isfile(listing) else ''
  version = next((line.split('==')[1].strip() for line in pins.splitlines()
                  if line.strip().lower().startswith(package.lower() + '==')), '')
  if package not in VENDORED_LICENSES:
    raise ValueError(f'{path}: vendored {package!r} has no entry in VENDORED_LICENSES; '
                     'add its SPDX id.')
  return {'package': package, 'version': version, 'license': VENDORED_LICENSES[package]}


def _origin(spec: str):
  """(package, version, distribution, licence files as (source file, stored path,
  covered folder)) of a pkg: or stdlib: spec."""
  kind, arg = sources.parse_source(spec)
  if kind == 'stdlib':
    package, version, dist = 'python', platform.python_version(), None
    licence = os.path.join(sources.stdlib_dir(), 'LICENSE.txt')
    if not os.path.isfile(licence):
      raise ValueError(f'{licence}: missing; vendor the stdlib files from a Python '
                       'installation that ships its LICENSE.txt.')
    licences = [(licence, 'LICENSE.txt', '')]
  else:
    package = arg.partition('/')[0]
    dist = importlib.metadata.distribution(package)
    version = dist.version
    licences = [(str(dist.locate_file(p)), p, covered) for p, covered in _dist_licenses(dist)]
  if not licences:
    raise ValueError(f'{spec}: its distribution ships no licence file; find one before '
                     'copying its code.')
  return package, version, dist, licences


def _read(path: str) -> bytes:
  with open(path, 'rb') as f:
    return f.read()


def _entries(organization: str, spec: str, copies: dict) -> list[dict]:
  """Manifest entries of one spec's files; `copies` gains stored path -> bytes."""
  package, version, dist, licences = _origin(spec)
  base = f'third_party/{package}-{version}'
  out = []
  for full, repo, path, license_ in sources.source_files(spec, collections.Counter()):
    inside = path if dist else os.path.relpath(full, sources.stdlib_dir()).replace(
        os.sep, '/')
    data = _read(full)
    entry = {
        'organization': organization, 'package': package, 'version': version,
        'distribution_path': inside, 'file': f'{base}/{inside}', 'repo': repo,
        'path': path, 'license': license_, 'bytes': len(data),
        'sha256': hashlib.sha256(data).hexdigest(),
        'license_files': [f'{base}/{stored}' for _, stored, covered in licences
                          if not covered or inside.startswith(covered + '/')]}
    vendored = dist and _vendored(dist, inside)
    if vendored:
      entry['vendored'] = vendored
    copies[entry['file']] = data
    copies.update({f'{base}/{stored}': _read(src) for src, stored, _ in licences
                   if f'{base}/{stored}' in entry['license_files']})
    out.append(entry)
  return out


def manifest(files: list[dict]) -> dict:
  """MANIFEST.json: the entries, and the content fingerprint of all and of each
  organization (collab.data.corpus.fingerprint; the data card records it per source)."""
  by_org = collections.defaultdict(list)
  for e in files:
    by_org[e['organization']].append(e)
  return {
      'about': "The default study's source files, copied by `python -m "
               "configs.corpus.vendor` from the distributions named; every read checks "
               'their sha256, so edit nothing here by hand.',
      'sha256': corpus.fingerprint(files),
      'organizations': {org: {'files': len(es), 'bytes': sum(e['bytes'] for e in es),
                              'sha256': corpus.fingerprint(es)} for org, es in by_org.items()},
      'files': files}


def vendor(out: str, selection=None) -> dict:
  """(Re)writes the corpus folder `out` from SOURCES (or `selection`); returns its manifest."""
  copies, files = {}, []
  for organization, specs in (selection or SOURCES).items():
    for spec in specs:
      files += _entries(organization, spec, copies)
  with io.atomic_dir(out) as tmp:
    for stored, data in sorted(copies.items()):
      os.makedirs(os.path.dirname(os.path.join(tmp, stored)), exist_ok=True)
      with open(os.path.join(tmp, stored), 'wb') as f:
        f.write(data)
    written = manifest(files)
    io.atomic_write_json(os.path.join(tmp, corpus.MANIFEST), written)
  return written


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  check_pins()
  out = _OUT.value or os.path.join(os.path.dirname(__file__), _CORPUS.value)
  written = vendor(out, CORPORA[_CORPUS.value])
  kb = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(out)
           for f in fs) / 1024
  print(f"{out}: {len(written['files'])} files, {kb:.0f} KB in all, sha256 "
        f"{written['sha256']}")


if __name__ == '__main__':
  app.run(main)
