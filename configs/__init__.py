"""ml_collections config files, one per scenario; each defines get_config()."""
