"""Built-in drivers, one module each (``<key>_driver.py``), imported only when chosen."""
