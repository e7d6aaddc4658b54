import { tokenSuite } from './token-suite.js';

tokenSuite('native');
