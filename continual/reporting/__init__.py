"""What a job reports: the forgetting metrics (pure functions of the accuracy matrix), the monitor that fills
that matrix by re-evaluating, the Markdown/PNG reports and the demo's closing summary."""
