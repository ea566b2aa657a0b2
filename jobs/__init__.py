"""What users run: the `raygen` CLI and the job runners."""
