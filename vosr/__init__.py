"""The shared library of the stage files and tools/: I/O, command lines, run dirs, data, reports."""
