"""The foundation layer (ARCHITECTURE.md): what every other package builds on, importing only torch."""
