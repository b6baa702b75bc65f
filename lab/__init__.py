"""Lab tooling: throwaway guests and sites for end-to-end tests on machines without KVM."""
