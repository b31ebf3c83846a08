# Put first on PYTHONPATH by .ci/run so that "import psutil" fails: the suite
# then runs the agent on its /proc metrics source, as on a host without psutil.
raise ImportError("psutil is made unimportable for this test run")
