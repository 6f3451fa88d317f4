"""The command line and the web app: thin layers over the library."""
