"""The runner that chains the steps: checks, plan, confirmation, resume, summary."""
