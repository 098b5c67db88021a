"""SSH/SFTP front door: auth, chrooted SFTP view, limits."""
