"""Drop-folder ingestion: files written into watched local or mounted folders enter the same
commit door as uploads (see docs/dropfolders.md).

- :mod:`relayd.ingest.rules`: pure logic (which names are taken, when a file has settled);
- :mod:`relayd.ingest.worker`: the blocking I/O, run in worker threads (scan, look, take, remove);
- :mod:`relayd.ingest.watch`: watchdog (inotify) behind add/remove/close;
- :mod:`relayd.ingest.check`: the start-time checks of the folders (:func:`check_dropfolders`);
- :mod:`relayd.ingest.dropfolder`: the watcher on the event loop (:class:`DropFolders`).
"""

from relayd.ingest.check import check_dropfolders
from relayd.ingest.dropfolder import DropFolders

__all__ = ["DropFolders", "check_dropfolders"]
