"""`crosstrim batch`: the three stages as Ray Data actor pools over Parquet (local or s3://)."""
