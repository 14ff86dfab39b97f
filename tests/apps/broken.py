"""An app that cannot be imported: the leader must give up with this traceback."""
raise ImportError("this module is broken on purpose")
