-- The databases of the dq stack, created once by their owner (DQ_POSTGRES_USER):
-- the Prefect server's, the MLflow tracking server's, and MLflow's basic-auth users.
CREATE DATABASE prefect;
CREATE DATABASE mlflow;
CREATE DATABASE mlflow_auth;
