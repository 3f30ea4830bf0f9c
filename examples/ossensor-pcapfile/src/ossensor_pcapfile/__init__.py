"""An example third-party ossensor plugin package: a pcap/pcapng replay capture backend
(:mod:`ossensor_pcapfile.capture`) and an EtherType filter (:mod:`ossensor_pcapfile.ethertype`)."""

__version__ = "0.1.0"
