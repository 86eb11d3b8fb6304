"""HTTP emulators of the marketplaces' metering APIs, following their documented behaviour."""
