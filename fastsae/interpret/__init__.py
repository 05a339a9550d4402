"""Step 3: features' activating windows, explanations, delphi's scores, the dashboard."""
