"""Drop-folder ingestion: files written into watched local or mounted folders enter the same
commit door as uploads (see docs/dropfolders.md).

- :mod:`relayd.ingest.rules`: pure logic (which names are taken, when a file has settled);
- :mod:`relayd.ingest.worker`: the blocking I/O, run in worker threads (scan, look, take, remove);
- :mod:`relayd.ingest.dropfolder`: the watcher on the event loop (:class:`DropFolders`).
"""

from relayd.ingest.dropfolder import DropFolders, check_dropfolders

__all__ = ["DropFolders", "check_dropfolders"]
