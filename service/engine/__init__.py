"""Engines behind one small interface (service.engine.base); they know no HTTP and no gateway config."""
