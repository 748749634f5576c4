"""ppn-bayes."""
