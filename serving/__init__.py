"""Ray Serve application that hosts raygen generators over HTTP."""
