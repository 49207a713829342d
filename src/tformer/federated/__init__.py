"""Federated learning on Flower: many data holders train one tformer model without pooling their
data. `partition` deals a task's training examples out (IID, Dirichlet over labels, natural
groups); `apps` holds the ClientApp and ServerApp (Flower's FedAvg / FedProx); `simulate` runs
them in Flower's simulation runtime, `deploy` writes the app a SuperLink and SuperNodes run."""
