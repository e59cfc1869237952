"""Process plumbing: malloc tuning, rank awareness under DDP, and what the machine can run."""
