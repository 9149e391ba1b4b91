"""The Streamlit triage dashboard and human review queue."""
