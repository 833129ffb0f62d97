"""`featdp bench`: the methods and peer libraries on the same features, in the same run."""
