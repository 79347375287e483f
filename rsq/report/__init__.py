"""Reading results: compare.py (`rsq report`), outliers.py (`rsq inspect`), plotting.py."""
