"""A checkpoint on local disk: saved, committed (complete or not), loaded, retained. No bucket in
sight."""
