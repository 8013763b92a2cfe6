"""collab's messages as Flower records: `meta` (a ConfigRecord holding one JSON string)
and `arrays` (an ArrayRecord of named numpy arrays, their bits as they are)."""

import json

from flwr.app import Array
from flwr.app import ArrayRecord
from flwr.app import ConfigRecord
from flwr.app import RecordDict


def pack(meta: dict, arrays: dict | None) -> RecordDict:
  records = {'meta': ConfigRecord({'json': json.dumps(meta)})}
  if arrays:
    records['arrays'] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
  return RecordDict(records)


def unpack(content: RecordDict) -> tuple:
  """(meta, arrays or None) of a message's content."""
  meta = json.loads(content['meta']['json'])
  arrays = ({k: v.numpy() for k, v in content['arrays'].items()}
            if 'arrays' in content else None)
  return meta, arrays
