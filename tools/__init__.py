"""Scripts that are not a paper stage, each run as `python -m tools.NAME` from the repository root;
the code they share with the stage files is the vosr package."""
