"""One module per console script: parse, hand over to package code, one line per error."""
