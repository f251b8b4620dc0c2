"""choreo's own AMQP 0-9-1 client: frame codecs (:mod:`.frames`) and one connection with its
channels (:mod:`.connection`). :mod:`choreo.transport.rabbitmq` builds the transport on it."""
