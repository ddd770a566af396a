"""ws-fhir-bridge: health record exchange between two data controllers."""
__version__ = "0.1.0"
