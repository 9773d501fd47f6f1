"""`crosstrim bench e2e`: the Serve app under locust, trimmed vs untrimmed, against HF generate."""
