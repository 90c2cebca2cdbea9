"""Integrations with training frameworks. Each lives in its own module and imports its
framework only when that module is imported: ``ikkuna_core.integrations.lightning``
(``pip install 'ikkuna-core[lightning]'``)."""
