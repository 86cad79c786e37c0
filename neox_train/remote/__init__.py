"""Where checkpoints and data live remotely: storage backends (gs://, folders) and rsync between them."""
