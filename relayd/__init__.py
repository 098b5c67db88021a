"""relayd: SFTP/SSH bulk-transfer relay."""

__version__ = "0.1.0"
