# Put first on PYTHONPATH by .ci/run so that "import psutil" fails: the suite
# then shows that nothing on Linux needs psutil, as on a host without it.
raise ImportError("psutil is made unimportable for this test run")
