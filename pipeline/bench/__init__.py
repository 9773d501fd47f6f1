"""Library benchmarks (no Ray Serve): `crosstrim bench decoder`. The Serve app's benchmark lives in loadtests/."""
