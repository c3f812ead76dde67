"""The case recorder: follows the daemon and keeps one folder per case, a durable, auditable record.

- :mod:`clients.recorder.documents`: the documents of a case's run (start, descriptor, event, action, stop), the
  factories that make them (:func:`compose_start`, :class:`Run`, :func:`fov_data`) and their JSON Schema.
- :mod:`clients.recorder.folder`: the case folder on disk (:class:`CaseFolder`): the append-only fsynced log, atomic
  rewrites, torn-line repair, ``recorder-state.json``, retries after a full disk.
- :mod:`clients.recorder.follow`: the :class:`Recorder` loop: what its :class:`~her2scope.clients.follower.Follower`
  hands on (the daemon's messages in order and once, snapshots, silence) turned into documents and files.
"""

from her2scope.clients.recorder.documents import (
    CLASSES,
    DOCUMENT,
    FOV_DATA_KEYS,
    SCHEMA_VERSION,
    ActionDoc,
    DataKey,
    DescriptorDoc,
    Document,
    EventDoc,
    FovData,
    Run,
    StartDoc,
    StopDoc,
    compose_start,
    document_schema,
    fov_data,
)
from her2scope.clients.recorder.folder import (
    EVENTS_FILE,
    REPORT_FILE,
    SCHEMA_FILE,
    STATE_FILE,
    CaseFolder,
    append_line,
    atomic_write,
    read_log,
)
from her2scope.clients.recorder.follow import TOPICS, LoopState, Recorder, compose_overlay

__all__ = [
    "CLASSES",
    "DOCUMENT",
    "EVENTS_FILE",
    "FOV_DATA_KEYS",
    "REPORT_FILE",
    "SCHEMA_FILE",
    "SCHEMA_VERSION",
    "STATE_FILE",
    "TOPICS",
    "ActionDoc",
    "CaseFolder",
    "DataKey",
    "DescriptorDoc",
    "Document",
    "EventDoc",
    "FovData",
    "LoopState",
    "Recorder",
    "Run",
    "StartDoc",
    "StopDoc",
    "append_line",
    "atomic_write",
    "compose_overlay",
    "compose_start",
    "document_schema",
    "fov_data",
    "read_log",
]
