"""Provider clients, one module per wire protocol, all behind :class:`base.Provider`."""
