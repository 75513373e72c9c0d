"""Views of what the harness recorded: figures of a run and the asv history."""
