"""The Flower ClientApp: a thin adapter around :func:`fedrobust.node.train_node_round`."""
